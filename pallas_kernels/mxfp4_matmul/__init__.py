"""MXFP4 grouped expert matmuls: ``kernel`` (Pallas) and ``reference`` (jnp), same signatures."""
