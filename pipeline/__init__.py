"""Prefect flows that chain ltta's DVC stages."""
