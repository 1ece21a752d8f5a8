"""The Kubernetes front end: kopf handlers and a small API client, around the core."""
