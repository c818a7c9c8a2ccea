"""From finished trials to numbers people quote: nested selection, statistics, the report and the plots.
Torch-free and Ray-free (readable on any laptop): imports store/ and data/'s torch-free metadata only."""
