"""The local devices: what they are (`local_cluster`) and what they measure (`calibrate`)."""
