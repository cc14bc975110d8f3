"""A tiny Flower app for the deployment tests: the ServerApp sends one message to every
connected node and writes what it saw to the file named by ``MEDFED_ECHO_OUT``; the ClientApp
replies with its node_config and a little about its process."""
