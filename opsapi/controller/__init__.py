"""The controller: the loop that carries out time-based transitions."""
