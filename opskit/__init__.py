"""opskit: operations, monitoring and load-testing toolkit for teams that depend on an LLM API."""

__version__ = "0.1.0"
