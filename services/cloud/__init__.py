"""Cloud tier: coordinates rounds, aggregates edges (hfm) or devices (star), writes results."""
