"""The database's 32-bit integer column, whose range every check of a stored whole number shares."""

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1  # PostgreSQL's integer: priorities, steps, seeds, milliseconds
