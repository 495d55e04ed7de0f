"""Edge tier: aggregates its cluster's modules every round, exchanges with the cloud every e_agg."""
