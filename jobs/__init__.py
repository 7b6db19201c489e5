"""The fine-tuning job queue: its tables, jobs and their events and checkpoints, stored files, and the worker's
configuration. The gateway enqueues and reads jobs here; training's worker processes claim and run them."""
