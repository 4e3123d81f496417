"""The sharding search: mesh shapes and the exact MILP over each parameter group's layout."""
