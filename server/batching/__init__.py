"""One bounded queue per model and the dynamic batcher that turns it into batches."""
