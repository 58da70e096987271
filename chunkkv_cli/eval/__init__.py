"""`chunkkv eval`: benchmark tasks run over a grid of methods x ratios, one prefill per sample."""
