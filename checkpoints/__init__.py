"""The tensorstore checkpoint format both frameworks read and write, and the official-weight adapters."""
