// Conversions between the wire types of proto/ropekv/v1 and cache/'s domain types, and the one
// place where absl::Status becomes grpc::Status.
#ifndef ROPEKV_SERVER_CONVERT_H_
#define ROPEKV_SERVER_CONVERT_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/compose.h"
#include "cache/kv_cache.h"
#include "cache/model.h"
#include "ropekv/v1/kvcache.pb.h"

namespace ropekv {

grpc::Status ToGrpc(const absl::Status& status);

// The status of one item of a batch call (SelectBatchItem, GatherBatchToBufferItem): its code (a
// google.rpc.Code, as absl's) and message.
template <typename Item>
void SetItemStatus(const absl::Status& status, Item* item) {
  item->set_code(static_cast<int32_t>(status.code()));
  item->set_message(std::string(status.message()));
}

// INVALID_ARGUMENT for an unspecified dtype or an unknown enum value.
absl::StatusOr<ModelSpec> FromProto(const v1::ModelSpec& proto);
v1::ModelSpec ToProto(const ModelSpec& spec);
v1::DType ToProto(DType dtype);

v1::Tier ToProto(TierKind tier);
void ToProto(const BlockInfo& info, v1::BlockInfo* out);
void ToProto(const CacheStats& stats, v1::StatsResponse* out);

std::vector<int32_t> FromProto(const google::protobuf::RepeatedField<int32_t>& tokens);
std::vector<ComposePart> FromProto(
    const google::protobuf::RepeatedPtrField<v1::ComposePart>& parts);

}  // namespace ropekv

#endif  // ROPEKV_SERVER_CONVERT_H_
