"""What the pipeline starts from: the model source, the calibration corpus, downloads, the fetch manifest."""
