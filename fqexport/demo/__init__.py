"""The embedded default task: synthetic group-labeled data, small models, training, and the
whole pipeline run end to end. Returns rows; the CLI prints them."""
