//! A chat whose backend is `backend.py`, a Python script using only the standard library:
//! Dormouse holds the WebSockets (`GET /v1/hooks/chat/ws?name=...`), the script decides
//! who connects, hears every message and disconnect through signed hook calls, and reaches
//! the other clients through the connection API (docs/HOOKS.md). This crate holds no code:
//! its test runs the script against a real server.
