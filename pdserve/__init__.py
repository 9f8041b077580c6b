"""pdserve: disaggregated prefill/decode LLM inference."""

__version__ = "0.1.0"
