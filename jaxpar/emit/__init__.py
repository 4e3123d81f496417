"""Plan to programs: the mesh and shardings, the flat step, the pipelined stage programs."""
