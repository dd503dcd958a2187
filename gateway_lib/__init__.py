"""AI gateway library: everything behind the thin functions in function_app.py."""
