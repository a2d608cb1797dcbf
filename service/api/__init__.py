"""The HTTP surface: routers per protocol, wire schemas, the V2 codec and the middlewares."""
