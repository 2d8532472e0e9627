"""Instance pools: where batches run, off the event loop."""
