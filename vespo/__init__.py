"""vespo: fully asynchronous RL for LLMs with the VESPO objective."""

__version__ = "0.1.0"
