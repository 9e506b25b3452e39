"""``make chaos``: the enricher stack under faults and hostile input, every input accounted for."""
