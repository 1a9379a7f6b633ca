# Writes the text file IN to OUT as a C++ raw string literal (the body of an initializer).
file(READ ${IN} text)
file(WRITE ${OUT} "R\"sluice_embed(${text})sluice_embed\"\n")
