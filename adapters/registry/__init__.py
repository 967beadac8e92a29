"""Registry storage: name -> versions -> manifest -> content-addressed blob."""
