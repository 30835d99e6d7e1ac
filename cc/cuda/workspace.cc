#include "cuda/workspace.h"

#include "core/row_math.h"
#include "cuda/plan.h"

namespace fused_xent {
namespace cuda {

size_t workspace_bytes(Kernel kernel, const Layout& layout, int element_size) {
  if (layout.rows() <= 0 || layout.classes <= 0 || kernel == Kernel::kSparseBackward) return 0;
  const Plan plan = shape_plan(layout, element_size);
  const size_t chunks = static_cast<size_t>(layout.rows()) * static_cast<size_t>(plan.splits);
  const bool wide = element_size == 8;  // double rows accumulate in double
  if (kernel == Kernel::kDenseBackward) return chunks * (wide ? sizeof(double) : sizeof(float));
  if (plan.splits == 1) return 0;
  return chunks * (wide ? sizeof(RowSums<double>) : sizeof(RowSums<float>));
}

}  // namespace cuda
}  // namespace fused_xent
