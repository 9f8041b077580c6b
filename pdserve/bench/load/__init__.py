"""``pdserve bench serve``, ``compare`` and ``report``: a load generator for any OpenAI-compatible
endpoint, and its reports. The workloads, records and statistics it uses are ``pdserve/traffic/``."""
