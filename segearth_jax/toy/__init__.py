"""The synthetic LaSeRS maker (`segearth data toy`): scenes -> instructions and answers -> release layout."""
