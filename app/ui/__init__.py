"""The dashboard at /ui: server-rendered page shells plus our own small JS, which reads the /v1 API."""
