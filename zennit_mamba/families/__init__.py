'''One file per model family: its canonized forwards and its complete layer map (the treatment of every module type
the family has). The table of supported families is built from these files.'''
