"""lwc: Learning both Weights and Connections (Han et al., NIPS 2015) in JAX/Flax."""

__version__ = "0.1.0"
