"""Runtime: the Ray connection and one actor pool that drives any unit worker."""
