"""What both training paths share to judge a model: metrics, the threshold rule, honest reporting, plots."""
