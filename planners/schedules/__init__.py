"""Pipeline schedules: the generators, the event simulator and the SPMD tick table."""
