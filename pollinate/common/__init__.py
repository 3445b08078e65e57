"""Shared machinery used by both the coordinator and edge clients; knows no particular method."""
