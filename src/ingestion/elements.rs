//! Elements of autocaptured events: parsing `$elements`, the elements hash, and the `elements_chain` text form.
