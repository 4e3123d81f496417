"""The pipeline search: stage cuts, schedules and the sharding inside each stage."""
