"""Deployment backends: where the controller's agents run."""
