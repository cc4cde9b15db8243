"""Infrastructure that is not the method: data / model parallelism, the Lightning strategy, random-generator
state, run folders."""
