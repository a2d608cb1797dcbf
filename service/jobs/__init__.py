"""Fine-tuning jobs: their records, the local and Redis queues, and the workers that run them."""
