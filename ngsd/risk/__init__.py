"""Risk estimation: how strongly each request is guarded (self-reflection; alpha per request)."""
