"""Wire schemas of the native REST API (`/v1`) and the V2 routes, one module per router."""
