"""LP-FT: the whole network (backbone + pooling + head), its optimiser and schedules, the training loop, weight
averaging and CPU-portable training convolutions.
"""
