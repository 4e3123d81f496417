"""Model to ModelGraph: parameters, logical names and the jaxpr walk the planners price."""
