"""milotile."""
