# XLA lowerings of the ops (being written).
