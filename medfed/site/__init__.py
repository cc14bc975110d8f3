"""Everything that happens inside one hospital: DP-SGD training and evaluation."""
