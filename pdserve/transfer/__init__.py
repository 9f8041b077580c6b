"""Moving a request's KV cache between workers: connectors, codecs, leases, wire format."""
