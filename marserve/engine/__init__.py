"""The engine: schedule -> execute (model runner) -> sample -> update, and its async front for the server."""
