"""Plumbing shared by the device, edge and cloud services: conversions, client, server, node runtime."""
