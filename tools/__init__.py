"""Tools that start or drive the services (the crossrec CLI, the demo, the local stack
launcher, the Redis servers, the load test, the trace collector): above the client library;
nothing imports them but tests, bench/ and locustfile.py (tools/README.md)."""
